"""Code only the tests use: the kernel checks shared by the simulator and device tests, and the two samplers
(Numba CPU, numba.cuda) that generate does not call yet (refimpl.generate samples on the host), kept here with
their tests until they are wired in."""
