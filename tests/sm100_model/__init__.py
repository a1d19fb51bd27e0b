"""sm100 functional model: the interpreter (interp), the host build helper (build), stream mutations
(mutate) and a hand-written plan (handplan) used by tests/test_sm100_conformance.py and
tests/test_sm100_model.py."""
