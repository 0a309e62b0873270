"""Pure pipeline stages: preprocess → segment → isolate → features → classify."""
