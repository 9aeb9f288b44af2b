from squeeze.cli.app import main

main()
