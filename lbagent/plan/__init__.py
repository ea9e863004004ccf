"""Planning: pure functions from the model and the health verdicts to what every layer must look like, and why.
Import its modules explicitly (`lbagent.plan.services`, `lbagent.plan.http`); this package re-exports nothing."""
