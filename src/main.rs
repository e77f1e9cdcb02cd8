fn main() {
    std::process::exit(monstervm::cli::main());
}
