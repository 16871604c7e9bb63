"""Planning runs from measured hardware profiles: profiles, a simulator, the planner."""

from .profile import Profile, ProfileError, load_profile, shipped_profiles
from .simulate import Prediction, RunConfig, Workload, simulate

__all__ = ["Profile", "ProfileError", "load_profile", "shipped_profiles", "Prediction", "RunConfig", "Workload",
           "simulate"]
