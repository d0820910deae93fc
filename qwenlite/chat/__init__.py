"""ChatML chat: template, sampling and stop-aware streaming generation."""
