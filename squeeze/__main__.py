from squeeze.cli import main

main()
