"""The nftables data plane: its own `table inet`, Maglev lookup maps, element-only health changes."""
