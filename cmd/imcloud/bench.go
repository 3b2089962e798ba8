package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
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
	if err := cmd.Run(); err != nil {
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
