"""Constants with one definition for the whole project."""
from __future__ import annotations

# Training stages, in the order they always run (training/, the demo, the stage plans).
STAGE_ORDER = ("align", "router_pretrain", "skill_tune")

# The ego vehicle's geometry when a scene does not give its own (meta "ego_size"): the NAVSIM / nuPlan convention
# (nuplan-devkit, get_pacifica_parameters: a Chrysler Pacifica), poses at the rear axle.
REAR_AXLE_TO_CENTER = 1.461  # m, rear axle -> box centre along +x
