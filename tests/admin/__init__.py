"""Tests of admin/: the admin API, its fuzzing and the admin page in real Chromium."""
