"""convert / convert-fast: a Plan in, a reduced Hugging Face checkpoint out."""
