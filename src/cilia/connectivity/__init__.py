"""`cilia connectivity test`: cilium-cli's connectivity suite, rebuilt for a cilia cluster.

Tests are data (`suite.py`: scenarios, policies, expectations); `runner.py` deploys the test
workloads (`deploy.py`), runs every action as a real probe from a network namespace
(`probes.py`), checks the flows each action must leave in the observe API (`flows.py`) and
prints cilium-cli's output (`report.py`).
"""
