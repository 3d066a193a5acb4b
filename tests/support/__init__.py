"""Code only the tests (and benchmarks) use: the two samplers (Numba CPU, numba.cuda) that generate does not call yet
(refimpl.generate samples on the host), kept here with their checks until they are wired in; a K-quant writer
(kquants.py) for GGUF test files."""
