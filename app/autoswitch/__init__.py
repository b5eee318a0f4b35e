"""Auto-switch: which models the GPUs should hold next.

`policy` is the pure part (usage, engine states and capacity in; actions with reasons out); the
switcher that reads usage from the history and applies actions through the supervisor sits
beside it and is the only part that does I/O.
"""
