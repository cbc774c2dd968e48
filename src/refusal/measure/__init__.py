"""Measurements: refusal judges, the evaluation of conditions, the paper's section 5 mechanisms, intervals."""
