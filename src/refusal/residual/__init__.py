"""Reading and writing the residual stream: hooks, projection, activations, directions, interventions, logit scores."""
