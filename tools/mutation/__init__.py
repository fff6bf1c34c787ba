"""Mutation testing of the root side: `make mutate` (python -m tools.mutation).

Each mutant is one small change to one module (a flipped comparison, a changed
constant, a negated condition, a deleted statement, `and`/`or` swapped, ...),
run against the tests that cover the lines it changes, in a copy of the tree
that carries a freeze guard no mutant can alter.  A mutant the tests let pass
is a survivor: a change of behaviour no test would notice.

  mutants.py     the mutants of a module (pure: source in, mutants out)
  guard.py       the FIFREEZE guard put into every copy after mutating
  tracer.py      per-test line coverage, pytest's process and its subprocesses
  testmap.py     which tests a mutant runs, in which order
  results.py     the results file (resumable) and the equivalent-mutant list
  report.py      the table per module and the survivors
  runner.py      copies of the tree, workers, timeouts, clean-up
  equivalent.txt mutants judged equivalent, one line each with why
"""
