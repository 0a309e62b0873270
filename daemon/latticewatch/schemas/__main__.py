"""``python -m latticewatch.schemas``: regenerate the shipped JSON Schemas from the event models."""

from latticewatch.schemas import write_schemas

for path in write_schemas():
    print(path)
