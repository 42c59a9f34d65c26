"""download: URL lists in (``url_lists``), HTTP fetch and image processing (``fetch``), the stage."""
