from backend_conformance import BackendConformance


class TestReferenceBackend(BackendConformance):
    backend = "reference"
