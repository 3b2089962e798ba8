package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
)

// benchCommand is the load generator's own binary; make build puts it
// beside imcloud.
const benchCommand = "imcloud-bench"

// cmdBench runs imcloud-bench with args: the load generator is its own
// command (cmd/imcloud-bench), out of the server binary, and "imcloud
// bench" stays the way to call it.
func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	path, err := findBench()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, stdout, stderr
	// A signal to imcloud goes on to the load generator: killed alone,
	// imcloud left it running (a swarm held its clients and ports for
	// its whole --hold).
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("bench: run %s: %w", path, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for waiting := true; waiting; {
		select {
		case s := <-sigs:
			_ = cmd.Process.Signal(s)
		case err = <-done:
			waiting = false
		}
	}
	if err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) && exit.ExitCode() > 0 {
			// imcloud-bench has said why on stderr.
			return exitCode(exit.ExitCode())
		}
		return fmt.Errorf("bench: run %s: %w", path, err)
	}
	return nil
}

// exitCode ends imcloud with a status and no message of its own: the
// command it ran has said why.
type exitCode int

func (c exitCode) Error() string { return fmt.Sprintf("exit status %d", int(c)) }

// findBench looks for imcloud-bench beside this executable, then on PATH.
func findBench() (string, error) {
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), benchCommand)
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	if p, err := exec.LookPath(benchCommand); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("bench: %s is not beside this binary nor on PATH: build it with make build (or go build ./cmd/%s)", benchCommand, benchCommand)
}
