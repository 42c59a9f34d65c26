"""captions: the DreamLIP CSV reader (``dreamlip``) and the stage that joins captions to images."""
