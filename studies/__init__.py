"""studies/ — what a researcher runs to test the paper's claims: studies/reproduce.py runs the
ablations and studies with seeds and counted budgets, studies/report.py writes their tables
and charts, studies/diagnostics.py holds the checks to make before believing a result,
studies/bench.py the benchmarks. results/ holds what they wrote."""
