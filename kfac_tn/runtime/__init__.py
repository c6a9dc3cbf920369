"""How computations run on a device: kernel routes (CPU or accelerator), batch chunk
sizes and reused scratch memory."""
