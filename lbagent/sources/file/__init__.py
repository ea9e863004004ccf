"""The YAML file source: `lbagent.yaml` parsed strictly, every problem reported with its line and field path."""
