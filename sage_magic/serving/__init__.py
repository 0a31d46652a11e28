"""Model servers: finding, merging, launching, supervising, leasing and stopping real vLLM servers."""
