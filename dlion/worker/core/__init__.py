"""What every communicating optimizer shares: the step skeleton, checks, config, state."""
