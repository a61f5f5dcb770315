"""Wire codecs and how their packets combine."""
