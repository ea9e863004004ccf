"""The iptables data plane (iptables-nft or legacy): HMARK into the same Maglev table through a trie of chains."""
