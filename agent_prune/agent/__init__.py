"""The agent: LangGraph controller, decisions and gates, planners."""
