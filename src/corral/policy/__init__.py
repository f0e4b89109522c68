"""Policy: what a sandbox may see, reach, run and use."""

from corral.policy.model import Commands, Env, Limits, Network, Policy, Zone
from corral.policy.profiles import PROFILES, make_profile

__all__ = ["PROFILES", "Commands", "Env", "Limits", "Network", "Policy", "Zone", "make_profile"]
