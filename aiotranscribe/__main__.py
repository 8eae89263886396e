from aiotranscribe.cli import main

main()
