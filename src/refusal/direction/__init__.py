"""Finding the direction: the paper's candidate selection and cleaning against protected prompts."""
