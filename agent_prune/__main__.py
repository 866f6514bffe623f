from agent_prune.cli import entry_point

entry_point()
