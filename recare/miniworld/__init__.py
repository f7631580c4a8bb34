"""The bundled offline mini world: renderer + captions (world), CLIP tokenizer, oracle
classifier, mini CLIP and the training recipe (``python -m recare.miniworld.train``)."""
