"""The default latticewatch profile: nanoparticle U-Net + 5-class stacking-fault forest.

The entry point ``latticewatch.profiles: nanoparticles`` resolves to this directory, which holds
``manifest.json`` and the model files it lists.
"""

from pathlib import Path

profile_dir = Path(__file__).resolve().parent
