"""What an operator runs: the `lbagent` command (check, plan, run, status, cleanup) and what check and plan use."""
