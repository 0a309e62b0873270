"""The graphene contamination profile (Sadre et al. 2021): surface contamination vs clean graphene.

The entry point ``latticewatch.profiles: graphene`` resolves to this directory, which holds
``manifest.json`` and the model files it lists. The manifest records how the network was trained
(the exact commands) and its fivefold, series-grouped cross-validation against the Bragg filter.
"""

from pathlib import Path

profile_dir = Path(__file__).resolve().parent
