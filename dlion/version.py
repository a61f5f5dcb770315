"""dlion's version: in the package metadata, and in every rank's fingerprint."""

VERSION = "0.1.0"
