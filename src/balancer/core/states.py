"""The words of a backend's state, the one vocabulary of every layer.

A backend has a health state (UP or DOWN: its checks and outlier detection decide) and an
admin state (READY, DRAIN or MAINT: the config, the API or the dashboard decide). The API
sets the admin state with the words of SETTABLE, where "up" means READY.
"""

UP = "up"
DOWN = "down"
READY = "ready"
DRAIN = "drain"
MAINT = "maint"

SETTABLE: dict[str, str] = {"up": READY, "drain": DRAIN, "maint": MAINT}
"""The admin state each word of the API sets."""
ACCEPTED: dict[str, str] = {**SETTABLE, READY: READY}
"""What a runtime change accepts: SETTABLE, and the admin state's own name for READY."""
