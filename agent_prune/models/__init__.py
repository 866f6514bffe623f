"""Loading, family adapters, parameter accounting, export and reload."""
