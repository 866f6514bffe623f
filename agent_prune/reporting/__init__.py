"""Reading traces, the run report and its plots."""
