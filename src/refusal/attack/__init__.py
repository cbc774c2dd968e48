"""The paper's section 5 attack: GCG suffix optimisation and its candidate scoring."""
