"""L7: HAProxy, run by lbagent: haproxy.cfg rendered, the process and its runtime API, the certificates it reads."""
