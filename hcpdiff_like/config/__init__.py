"""Config composition (Hydra), resolvers and start-up validation."""
