"""Training side of dcar: procedural captioned scenes, the tokenizer and generator training loops,
ShapesEval, and the export of a weights directory."""
