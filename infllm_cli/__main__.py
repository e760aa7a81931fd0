from infllm.cli.app import main

main()
