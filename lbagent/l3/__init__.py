"""L3: the VIPs bound on this node and their BGP announcements (ExaBGP: its config rendered, the speaker, the
bridge)."""
