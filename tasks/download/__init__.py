"""download: URL lists in (``url_lists``), HTTP fetch (``fetch``), image processing (``images``), the stage."""
