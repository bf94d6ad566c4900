"""The MoE expert cache: which experts stay on the device, and what to do on a miss."""
